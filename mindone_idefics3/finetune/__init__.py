"""Fine-tuning (LoRA and full) on conversations with images: data and labels (data.py), LoRA targets, fresh
adapters and their PEFT files (lora.py; the LoRA layer itself is model/lora.py), AdamW and schedules (optim.py), the
training loop with data parallelism under msrun (trainer.py), the Hugging Face export (export.py) and the command
line (cli.py). Sits on top of model/ and processing/."""
