"""Project-wide test settings: one torch thread (tiny models run far faster without thread
contention), no progress bars."""

import os

import torch

os.environ.setdefault("FISHERTUNE_PROGRESS", "0")
torch.set_num_threads(1)
