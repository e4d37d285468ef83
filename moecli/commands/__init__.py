"""The `moe` subcommands, one module each; `moecli.cli` imports them and they register with
`moecli.cli.command`."""
