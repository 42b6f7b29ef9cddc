"""The harness itself: what keeps parallel test runs from failing each other."""

import socket

from twisted.trial.unittest import SynchronousTestCase

from tests.support.harness import SynapseProcess, free_port


class PortTests(SynchronousTestCase):
    def test_free_ports_avoid_the_ephemeral_range_and_repeats(self) -> None:
        """Ports come from below the kernel's ephemeral range (where outgoing
        connections could take them) and are never handed out twice."""
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
        ports = [free_port() for _ in range(200)]
        self.assertEqual(len(set(ports)), len(ports))
        self.assertTrue(all(1024 <= port < ephemeral_low for port in ports), ports)

    def test_start_moves_to_fresh_ports_when_one_is_taken(self) -> None:
        """Another process binds Synapse's client port before Synapse does:
        Synapse exits at once, and the harness starts it again on fresh ports."""
        hs = SynapseProcess(None)
        self.addCleanup(hs.cleanup)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
            squatter.bind(("127.0.0.1", hs.client_port))
            squatter.listen(1)
            taken = hs.client_port
            hs.start()
        self.assertNotEqual(hs.client_port, taken)
        self.assertEqual(hs.client("GET", "/health").status, 200)
        with open(hs._stderr_path, errors="replace") as f:
            self.assertIn("Address already in use", f.read())
