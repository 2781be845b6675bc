"""Fine-tuning (LoRA and full) on conversations with images: data and labels (data.py), LoRA on the fused
projections with PEFT's file format (lora.py), AdamW and schedules (optim.py), the training loop with data
parallelism under msrun (trainer.py), and the command line (cli.py). Sits on top of model/ and processing/."""
