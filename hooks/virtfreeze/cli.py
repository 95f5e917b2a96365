"""Command line: the only place that prints results and chooses exit codes."""
import click
from virtfreeze import __version__

@click.group()
@click.version_option(__version__, prog_name="virtfreeze")
def cli():
    """virtfreeze"""

def main():
    cli()
