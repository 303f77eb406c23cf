"""Train the Wav2Lip generator with L1, the frozen expert's sync loss and a Wasserstein critic with gradient penalty.

    python wloss_hq_wav2lip_train.py --data_root PREPROCESSED --checkpoint_dir savedmodel --syncnet_checkpoint_path savedmodel/checkpoint_step000000001.pth

Trains the layout of the expert it is given (288x288 for the seed's lines); --preset 96 / 288 / tiny
must agree with that expert.
Add --hparams "key=value,...", --max_steps N, --device; resume with --checkpoint_path.
Multi-GPU: torchrun --nproc_per_node N wloss_hq_wav2lip_train.py ...
"""
import sys

from lipsync.train.training import main_for
from lipsync.train.trainers import WGANTrainer


def main(argv=None) -> int:
    return main_for(WGANTrainer, __doc__.strip().splitlines()[0], argv, needs_expert=True, needs_disc=True)


if __name__ == "__main__":
    sys.exit(main())
