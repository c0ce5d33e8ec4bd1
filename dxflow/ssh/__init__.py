"""SSH exactly as the user's OpenSSH would do it: its resolved settings, and its client as a transport.

Below ``master`` and ``cli`` (both use it); it imports nothing of dxflow but ``errors``, ``config`` and ``layout``.

Modules, one concern each:

- ``options``    a host's settings as ``ssh -G`` resolves them (``/etc/ssh/ssh_config``, ``Include``,
  ``Match``, every ``ProxyJump`` hop, both known_hosts lists), and which of them paramiko cannot honour
- ``knownhosts`` known_hosts read the way paramiko can use them (``@cert-authority``, ``@revoked``)
- ``paramiko_login`` the paramiko login to one host as OpenSSH would make it (keys, host keys, ciphers),
  or :class:`~dxflow.ssh.transport.UseOpenSSH` where only OpenSSH can; the pool of these transports is
  :mod:`dxflow.master.tunnels`
- ``control``    where the ControlMaster sockets live, and the argv of every ssh command dxflow runs
- ``mux``        a channel through a ControlMaster, by OpenSSH's multiplexing protocol (no process)
- ``controlmaster`` one ControlMaster: started, found on its socket, watched through a pidfd, ended
- ``openssh``    :class:`~dxflow.ssh.openssh.OpenSSHPool`: one ControlMaster per node (per job under pam_slurm_adopt)
- ``transport``  the interface both transports offer, and the ``ssh_transport`` setting
- ``adoption``   which connection serves which job's agents where ``pam_slurm_adopt`` puts each login in a job

docs/ssh.md says which transport a site gets, and why.
"""
