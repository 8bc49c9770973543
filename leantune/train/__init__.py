from .compile import compile_blocks

__all__ = ["compile_blocks"]
