"""Train the lip-sync expert (SyncNet) on mel windows vs. the lower halves of 5 frames.

    python color_syncnet_train.py --data_root PREPROCESSED --checkpoint_dir savedmodel

Trains the 288x288 HQ layout unless --preset 96 (the paper's) or --preset tiny (CPU tests) is given.
Add --hparams "key=value,...", --max_steps N, --device; resume with --checkpoint_path.
Multi-GPU: torchrun --nproc_per_node N color_syncnet_train.py ...
"""
import sys

from lipsync.train.training import main_for
from lipsync.train.trainers import ExpertTrainer


def main(argv=None) -> int:
    return main_for(ExpertTrainer, __doc__.strip().splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
