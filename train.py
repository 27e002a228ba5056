"""Train a CoCA (or RoPE, ALiBi) GPT. Defaults: the shakespeare-cpu preset (2m32s-2m55s measured on 2 CPU cores).

    python train.py                                   # shakespeare-cpu, writes out/ckpt.pt
    python train.py --preset=pycode-cpu --attention=rope --out_dir=out-pycode-cpu-rope
    python train.py --resume                          # continue out/ckpt.pt where it stopped
    python train.py --init_from=out-rope --attention=coca --out_dir=out-dropin   # CoCA from RoPE weights
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
