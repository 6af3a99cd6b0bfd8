"""The official release's example: one forward/backward pass of MoEUT_244M (on the GPU if there is one,
otherwise on the CPU with a smaller batch: under a minute on 2 cores, most of it building the model)."""

import torch
import torch.nn.functional as F

import moeut
import profiles

device = "cuda" if torch.cuda.is_available() else "cpu"
batch_size, context_window = (8, 1024) if device == "cuda" else (2, 256)
vocab_size = 8000

tokens = torch.randint(0, vocab_size, (batch_size, context_window + 1), device=device)

model = moeut.MoEUTLM(vocab_size, **profiles.MoEUT_244M).to(device)
with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
    out = model(tokens[:, :-1])
    print("Output shape: ", out.outputs.shape)
    loss = F.cross_entropy(out.outputs.float().view(-1, vocab_size), tokens[:, 1:].flatten())
(loss + out.reg_loss).backward()

print("Loss: ", loss.item(), " reg_loss: ", out.reg_loss.item(), " device: ", device)
