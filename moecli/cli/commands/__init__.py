"""The `moe` subcommands, one module each; `moecli.cli.main` imports them and each registers itself
with `moecli.cli.app.command`."""
