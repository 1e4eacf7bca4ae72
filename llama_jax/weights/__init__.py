"""Weight formats: params-only checkpoints, Hugging Face / Meta / PEFT conversion, init_from."""
