"""``python -m dsnode.bench ...`` runs the bench command."""

from dsnode.bench.cli import bench_command

bench_command(prog_name="python -m dsnode.bench")
