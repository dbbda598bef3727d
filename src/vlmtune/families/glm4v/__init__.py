from .family import FAMILY

__all__ = ["FAMILY"]
