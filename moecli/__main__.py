"""`python -m moecli` is `moe`."""
from moecli.cli import app

app(prog_name="moe")
