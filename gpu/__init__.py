"""`make gpu-check`: the GPU acceptance stages (gpu/stages.py) and their runner (gpu/check.py)."""
