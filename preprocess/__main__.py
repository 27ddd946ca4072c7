"""python -m repa.preprocess  ==  repa-preprocess (also: torchrun -m repa.preprocess ...)."""
import sys

from repa.preprocess.cli import main

sys.exit(main())
