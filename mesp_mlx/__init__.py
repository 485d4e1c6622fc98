"""mesp-mlx: LoRA fine-tuning with memory-efficient structured backpropagation (MeSP) on MLX."""
__version__ = "0.1.0"
