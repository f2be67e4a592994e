"""Asterisk's side, simulated: for `tm4 lab` (no Asterisk package in Debian 12) and the tests.

Each speaks the real wire protocol the way Asterisk 22 (chan_pjsip) did in the
captures tm4's tests replay (framing, field names and order, line endings):

- tm4.lab.sim.ami: the manager interface's texts and security events, and AmiServer —
  banner, Login, Ping, Reload, Logoff, `\\r\\n` framing — pushing security events
  to logged-in clients.
- tm4.lab.sim.sip: chan_pjsip answering REGISTER/INVITE (401 challenge, 401 after a
  wrong digest, 200 after a right one) and raising the matching AMI events only
  for packets that really reached it; a registrar and a phone for the lab; the
  SIPp REGISTER scenario.
- tm4.lab.sim.agi: a caller on FastAGI — the environment block, then one reply per
  command, the keys typed at each GET DATA.

The lab runs them on threads of its own process, on sockets opened inside a network
namespace (tm4.firewall.netns: a socket keeps the namespace it was made in).
"""
