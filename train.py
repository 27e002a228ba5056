"""Train a CoCA (or RoPE) GPT. Defaults: the shakespeare-cpu preset, a few minutes on a laptop CPU.

    python train.py                                   # shakespeare-cpu, writes out/ckpt.pt
    python train.py --preset=pycode-gpu --attention=rope
    python train.py --resume                          # continue out/ckpt.pt where it stopped
    torchrun --nproc_per_node=2 train.py --preset=pycode-gpu

Options: every field of nanococa.config.TrainConfig as --key=value (see README).
"""
from nanococa.config import make_config
from nanococa.errors import run_script
from nanococa.trainer import train


def main(argv):
    return train(make_config(argv))


if __name__ == "__main__":
    run_script(main)
