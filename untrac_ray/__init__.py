"""untrac-ray: which training datasets made a language model say what it says (UnTrac on Ray)."""

__version__ = "0.1.0"
