"""The input side: images → tiles (image.py), prompts → expanded text (prompt.py) → token ids (tokenizer.py),
conversations → prompts (chat_template.py), all behind `Idefics3Processor` (processor.py). No MindSpore here."""
from .image import Idefics3ImageProcessor, ImageBatch, ImageProcessorConfig
from .image_io import load_image
from .processor import Idefics3Processor, ProcessorOutput
from .tokenizer import IncrementalDetokenizer, TextTokenizer

__all__ = ["Idefics3ImageProcessor", "Idefics3Processor", "ImageBatch", "ImageProcessorConfig",
           "IncrementalDetokenizer", "ProcessorOutput", "TextTokenizer", "load_image"]
