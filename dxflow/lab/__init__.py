"""A real, throwaway Slurm cluster on this one machine: ``dxflow lab up|down|status``.

Each compute node is a network namespace (its own address on a bridge), a
UTS namespace (its own host name) and, where the host allows, cgroups of its
own; every node shares the machine's filesystem and process table, the way a
real cluster shares a home directory. The login
node is the host itself, reached as ``dxlab-login``. The lab runs Debian's own
Slurm, munge and OpenSSH; dxflow is installed for every user under ``/opt``.

Modules, one concern each:

- ``layout``   names, addresses and paths of every piece (data only)
- ``runner``   the one place that runs commands and turns failures into errors
- ``state``    the state file that lets ``down`` undo exactly what ``up`` made
- ``blocks``   marked blocks in shared text files (/etc/hosts, ssh_known_hosts)
- ``packages`` Debian packages the lab needs
- ``install``  dxflow for every user, and the scheduler hook scripts
- ``users``    the lab's users and their SSH keys
- ``network``  bridge, namespaces, host names and host keys
- ``cgroups``  each node's own cgroup trees, namespace and mounts (Slurm's cgroup plugins; docs/lab.md)
- ``slurm``    slurm.conf (rendered from data) and the Slurm commands the lab uses
- ``procs``    pid files and processes
- ``daemons``  starting and stopping munged, slurmctld, slurmd and sshd
- ``cluster``  ``up``, ``down`` and ``status`` built from the pieces above
- ``trace``    counting a process's scheduler calls and file-system look-ups with strace (the benches')
- ``private_master`` a lab user's master in a folder of its own, for what counts one master's work
- ``ssh_profiles`` SSH as real sites run it, added to a running lab (``dxflow lab profile``): host
  certificates, hostbased, MFA, two ProxyJump hops, an ``Include``, pam_slurm_adopt; docs/ssh.md
- ``rootfs``   a cached Debian root per Slurm generation (22.05, 24.11, 26.05), built once with mmdebstrap
- ``capture``  real output of each generation (``capture_inside`` runs in its root) kept as test fixtures
- ``generation`` a whole lab of another Slurm generation beside the host's (``lab up --slurm``, ``lab exec``)
- ``site``     the federated site service added to a running lab (``lab site up|down|status``, ``lab up --site``)
- ``replicas`` the site's two replicas: ports, config files, state file, start and stop (SIGKILL in the HA test)
- ``postgres`` the lab's own PostgreSQL cluster (socket only, peer authentication) the site's replicas share
- ``pbslab``   the second cluster: PBS stand-ins on the lab's nodes, prologues run as pbs_mom runs them
"""

from __future__ import annotations

from dxflow.lab.layout import Layout, Node

__all__ = ["Layout", "Node"]
