"""ifw.core: what two or more components share, torch-free.

- ``contract``: the runner <-> operator <-> gateway contract (env names, exit codes,
  termination message, reasons, labels, annotations, phases, times);
- ``transcript``: the stored transcript, the one schema of a result;
- ``formats``: the one place a transcript is rendered (original API json, OpenAI shapes, srt, vtt);
- ``results``: result storage (Secret, S3) and its own settings;
- ``netguard``: the SSRF-guarded HTTP transport for every request made on a user's behalf;
- ``kube``: the one Kubernetes client factory;
- ``processes``: child processes that die with their parent (PR_SET_PDEATHSIG);
- ``languages``, ``validators``: shared data and checks.
"""
