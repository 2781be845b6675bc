"""An OpenAI-compatible chat-completions server (FastAPI + uvicorn) on top of generation.py and processing/:
`idefics3-serve` / `python -m mindone_idefics3.serve`. See cli.py (flags), app.py (HTTP), engine.py (scheduling)."""
