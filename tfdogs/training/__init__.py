"""Training a network on the photos: phases, optimizer, callbacks, devices and machines, the loop.

Modules, from one step up to the whole run:
    phases: head first then the whole network, what each phase freezes (`plan_phases`, `configure_phase`).
    optimizer: warm-up and cosine schedule; per-variable rates and decoupled weight decay.
    callbacks: checkpoints written atomically, resumable early stopping, epoch-keyed seeds.
    resume: what a run folder says is finished, and whether new settings may go on from it.
    devices, cluster: strategies and precision on one machine; multi-worker training across machines.
    interruption: Ctrl-C and SIGTERM that end with one line.
    prepare: the run's output folder, its checked data, split and pipelines.
    loop: `train(config)`, one experiment end to end (its command line is `tfdogs.train`).
"""
