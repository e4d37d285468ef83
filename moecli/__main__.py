"""`python -m moecli` is `moe`."""
from moecli.cli.main import app

app(prog_name="moe")
