"""Shared pytest setup: the tests use tiny tensors, where one intra-op thread is fastest and most stable."""

import torch

torch.set_num_threads(1)
