"`python -m ulmfit_tx.cli`: the `ulmfit-tx` program."

from . import run

run()
