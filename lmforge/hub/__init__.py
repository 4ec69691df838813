"""Open models in and out: Hugging Face folders and GGUF files to lmforge checkpoints, and back to HF.

    lmforge import path/to/hf_model_folder --out models/smollm2
    lmforge import SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2
    lmforge export runs/x --format hf --out hf/x

`hf.py` maps Hugging Face configs and weight names to `ModelConfig` and back; `gguf_import.py`
reads llama.cpp's GGUF files (dequantizing, undoing its q/k row permutation, rebuilding the
tokenizer); `import_cmd.py` and `export_cmd.py` are the two commands.
"""
