"""python -m repa.sampler  ==  repa-sample (repa-eval is python -m repa.sampler.eval_cli)."""
from repa.sampler.sample_cli import cli

cli(prog_name="repa-sample")
