"""Measure GGUF models in llama.cpp (through llama-cpp-python): perplexity, KL divergence, speed, memory."""
