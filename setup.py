from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "mindone_idefics3" / "version.py").read_text(), version)

setup(
    name="mindone_idefics3",
    version=version["__version__"],
    description="Idefics3 / SmolVLM vision-language models in MindSpore for Ascend NPUs (and CPU)",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["mindone_idefics3", "mindone_idefics3.*"]),
    install_requires=[
        # Any release in the supported range: on Ascend it is the one that matches the installed CANN (docs/ascend.md).
        "mindspore" + version["MINDSPORE_REQUIRES"],
        "numpy<2",  # MindSpore 2.7-2.10 are built against NumPy 1.x
        "pillow>=9.1",
        "safetensors>=0.4",
        "huggingface_hub>=0.23",
        "tokenizers>=0.19",
        "jinja2>=3.1",
        "tqdm>=4.60",
    ],
    extras_require={
        # The reference implementation every parity test compares against (CPU torch wheel).
        # peft: the LoRA reference and adapter format of the fine-tuning tests. The server tests start the real
        # server (the serve extra) and talk to it with the openai client and httpx.
        # The video tests write clips with PyAV and compare with transformers' SmolVLM video code (num2words).
        "test": ["pytest>=7", "hypothesis>=6.100", "torch==2.13.0", "transformers==4.57.1", "peft==0.21.2",
                 "openai>=1.40", "httpx>=0.27", "fastapi>=0.110,<1", "uvicorn>=0.29,<1", "prometheus_client>=0.20,<1",
                 "av>=12", "num2words>=0.5.10"],
        # SmolVLM2 videos: PyAV decodes them (FFmpeg inside its wheels); num2words spells the frame count in the
        # prompt, as transformers' SmolVLMProcessor does.
        "video": ["av>=12", "num2words>=0.5.10"],
        # idefics3-serve: the OpenAI-compatible HTTP server.
        "serve": ["fastapi>=0.110,<1", "uvicorn>=0.29,<1", "prometheus_client>=0.20,<1"],
        "plot": ["matplotlib"],
        # benchmarks/prepare_dataset.py: datasets from the Hugging Face hub. pyarrow 26 needs numpy 2, which
        # MindSpore 2.10 cannot import; 22 works with numpy 1.26.
        "eval": ["datasets>=2.14", "pyarrow<23"],
    },
    entry_points={
        "console_scripts": [
            "idefics3-generate=mindone_idefics3.cli:main",
            "idefics3-convert=mindone_idefics3.convert:main",
            "idefics3-batch=mindone_idefics3.batch.cli:main",
            "idefics3-eval=mindone_idefics3.eval.cli:main",
            "idefics3-finetune=mindone_idefics3.finetune.cli:main",
            "idefics3-serve=mindone_idefics3.serve.cli:main",
        ]
    },
)
