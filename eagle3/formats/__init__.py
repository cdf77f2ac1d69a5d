"""Checkpoint layouts and exports: EAGLE/SGLang, speculators/vLLM, GGUF for llama.cpp, OpenVINO IR."""
