"""The launch layer: SLURM job rendering and submission (:mod:`.slurm`), the fail-fast setup
guard every rank runs (:mod:`.fail_fast`), a torchrun rank's exit with its launcher
(:mod:`.orphan`) and torchrun passing SIGUSR1 on to its ranks (:mod:`.torchrun`). The shell side
lives in ``launch/`` (torchrun script, sbatch templates); where a process sits in the launch is
read by ``parallel/mesh.py: resolve_env``."""
