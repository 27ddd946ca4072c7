"""python -m repa.trainer  ==  repa-train (also: accelerate launch -m repa.trainer ...)."""
from repa.trainer.cli import main

main()
