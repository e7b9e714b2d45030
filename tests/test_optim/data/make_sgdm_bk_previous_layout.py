"""Wrote sgdm_bk_previous_layout.pth with the code before the root family
had its own keys (run with PYTHONPATH set to a checkout of that code)."""
import sys

import torch
import torch.nn as nn

from mmprecond.optim import SGDM_BK

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
opt = SGDM_BK(model.parameters(), model=model, lr=0.05, stat_interval=1,
              inv_interval=2)
g = torch.Generator().manual_seed(1)
for _ in range(3):
    x = torch.randn(8, 6, generator=g)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
torch.save(dict(model=model.state_dict(), optim=opt.state_dict()), sys.argv[1])
