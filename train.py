"""Train a CoCA (or RoPE, ALiBi) GPT, or fine-tune a pretrained model converted to CoCA. Defaults: the
shakespeare-cpu preset (2m32s-2m55s measured on 2 CPU cores). The loop: train_loop() in nanococa/trainer.py.

    python train.py                                   # shakespeare-cpu, writes out/ckpt.pt
    python train.py --preset=pycode-cpu --attention=rope --out_dir=out-pycode-cpu-rope
    python train.py --resume                          # continue out/ckpt.pt where it stopped
    python train.py --init_from=out-rope --attention=coca --out_dir=out-dropin   # CoCA from RoPE weights
    python train.py --init_from=hf:smollm2 --attention=coca --corpus=pycode --out_dir=out-hf-coca  # drop-in
    torchrun --nproc_per_node=2 train.py --preset=pycode-gpu

Options: every field of nanococa.config.TrainConfig as --key=value (python train.py --help).
"""
from nanococa.errors import interruptible, run_script

with interruptible():  # Ctrl-C while torch imports is one line too
    from nanococa.config import make_config
    from nanococa.trainer import train


def main(argv):
    return train(make_config(argv))


if __name__ == "__main__":
    run_script(main)
