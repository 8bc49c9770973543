from .compile import compile_blocks
from .memory import return_freed_memory

__all__ = ["compile_blocks", "return_freed_memory"]
