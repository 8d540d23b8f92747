"""lib_ortholora: a LoRA toolbox for Stable Diffusion (extract, merge, join, resize, orthogonalize).

Pure torch + safetensors; nothing from the webui. The public API is re-exported here.
"""
__version__ = "0.1.0"
