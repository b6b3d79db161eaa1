"""The launch layer: where this process sits in a launch (:mod:`.env`: torchrun's or SLURM's
variables), SLURM job rendering and submission (:mod:`.slurm`), the fail-fast setup guard every
rank runs (:mod:`.fail_fast`), the watch that stops every rank when one fails mid-run
(:mod:`.failure_watch`), a torchrun rank's exit with its launcher (:mod:`.orphan`) and
torchrun passing SIGUSR1 on to its ranks (:mod:`.torchrun`). The shell side lives in ``launch/``
(torchrun script, sbatch templates); ``parallel/mesh.py: init_distributed`` joins the process
group :mod:`.env` describes."""
