"""0MQ plumbing on the beamline side: a stoppable proxy and a safe-serialising publisher.

The proxy does what bluesky's ``Proxy`` / ``bluesky-0MQ-proxy`` does (a SUB socket publishers
connect to, forwarded to a PUB socket subscribers connect to), but runs on a thread that
:meth:`ZmqProxy.stop` ends cleanly (a command on an in-process control socket), and binds
loopback ports chosen by the OS. In production ``bluesky-0MQ-proxy IN OUT`` is a drop-in
replacement: the wire format is the same.
"""

from __future__ import annotations

import threading
import uuid

import zmq
from bluesky.callbacks.zmq import Publisher

from apt_stream.errors import ServiceError
from apt_stream.stream.decode import PROBE_NAME, encoder_for


class ZmqProxy:
    """A forwarding proxy on ``host`` (loopback by default), ports 0 = any free port.

    Attributes
    ----------
    in_address
        Where publishers connect (``tcp://127.0.0.1:<port>``).
    out_address
        Where subscribers connect.
    """

    def __init__(self, *, host: str = "127.0.0.1", in_port: int = 0, out_port: int = 0) -> None:
        self._context = zmq.Context()
        self._control_address = f"inproc://apt-proxy-{uuid.uuid4().hex}"
        try:
            self._frontend = self._bind(zmq.SUB, host, in_port)
            self._frontend.setsockopt(zmq.SUBSCRIBE, b"")
            self._backend = self._bind(zmq.PUB, host, out_port)
            self._control = self._context.socket(zmq.PAIR)
            self._control.bind(self._control_address)
        except zmq.ZMQError as exc:
            self._context.destroy(linger=0)
            raise ServiceError(f"0MQ proxy could not bind on {host}: {exc}") from exc
        self.in_address = self._frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.out_address = self._backend.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._stopping = threading.Event()  # ends the loop even if the command were lost
        self._lock = threading.Lock()

    def _bind(self, kind: int, host: str, port: int) -> zmq.Socket:
        socket = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        if port:
            socket.bind(f"tcp://{host}:{port}")
        else:
            socket.bind_to_random_port(f"tcp://{host}")
        return socket

    def __repr__(self) -> str:
        return f"ZmqProxy(in={self.in_address}, out={self.out_address})"

    def _serve(self) -> None:
        # A plain forwarding loop rather than zmq.proxy_steerable: libzmq's steerable proxy now
        # and then missed its TERMINATE command here, and documents are small, so Python keeps up.
        poller = zmq.Poller()
        poller.register(self._frontend, zmq.POLLIN)
        poller.register(self._control, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(500))
                if self._control in ready:
                    return
                if self._frontend in ready:
                    for _ in range(1000):  # drain a burst, then look at the control socket again
                        try:
                            parts = self._frontend.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._backend.send_multipart(parts)
        finally:
            for socket in (self._frontend, self._backend, self._control):
                socket.close(linger=0)

    def start(self) -> ZmqProxy:
        """Forward on a daemon thread; returns self."""
        with self._lock:
            if self._thread is not None or self._stopped:
                raise ServiceError("a proxy starts once; create a new one after stop()")
            self._thread = threading.Thread(target=self._serve, name="apt-zmq-proxy", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """End forwarding and release the ports (safe to call twice)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stopped = True
            if thread is None:
                if not self._context.closed:
                    self._context.destroy(linger=0)
                return
            self._stopping.set()
            command = self._context.socket(zmq.PAIR)
            try:
                command.connect(self._control_address)
                command.send(b"TERMINATE")
            finally:
                # Linger so the command is delivered before the socket goes (linger=0 drops it).
                command.close(linger=1000)
            thread.join(timeout)
            if thread.is_alive():
                raise ServiceError("0MQ proxy thread did not stop")
            self._context.term()

    def __enter__(self) -> ZmqProxy:
        return self if self._thread is not None else self.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_proxy(*, host: str = "127.0.0.1", in_port: int = 0, out_port: int = 0) -> ZmqProxy:
    """Start a :class:`ZmqProxy` (free ports by default); ``proxy.stop()`` ends it."""
    return ZmqProxy(host=host, in_port=in_port, out_port=out_port).start()


def make_publisher(address: str, *, serializer: str = "msgpack", prefix: bytes = b"") -> Publisher:
    """A bluesky ``Publisher`` to a proxy's input that encodes with msgpack (default) or JSON.

    Never pickle: subscribers refuse it by default.
    """
    return Publisher(address, prefix=prefix, serializer=encoder_for(serializer))


def wait_for_link(
    publisher: Publisher,
    probe_seen: threading.Event,
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.05,
) -> int:
    """Send link probes through ``publisher`` until ``probe_seen`` is set (by a subscriber,
    e.g. :attr:`ZmqDocumentSource.probe_seen`); returns the number of probes sent.

    0MQ drops what a PUB socket sends before the connection and subscription are up; this proves
    the publisher -> proxy -> subscriber path is live before a run starts.
    """
    sent = 0
    attempts = max(1, int(timeout_s / interval_s))
    for _ in range(attempts):
        publisher(PROBE_NAME, {"token": uuid.uuid4().hex})
        sent += 1
        if probe_seen.wait(interval_s):
            return sent
    raise ServiceError(f"no subscriber saw a link probe within {timeout_s} s")
