"""A Ray fault for the tests of the commands' local Ray start: raylets that never register."""

# Source of ``stop_raylets(root, first_only)``, put in front of a test's subprocess script: it stops every
# raylet among ``root``'s descendants (or the first one only) as it appears, a raylet that never registers
# with its GCS, as on a machine too busy to run it within Ray's fixed wait, and returns the stopped pids.
# The watch goes on while other children come and go: only the watched command's own end stops it.
STOP_RAYLETS = """
import signal, threading, time, psutil
def stop_raylets(root, first_only):
    stopped = []
    def watch():
        while not (first_only and stopped):
            try:
                children = psutil.Process(root).children(recursive=True)
            except psutil.NoSuchProcess:  # the watched command has ended
                return
            for p in children:
                try:  # a child may end between the listing and here (a failed start's are being killed)
                    if p.pid not in stopped and p.name() == "raylet":
                        p.send_signal(signal.SIGSTOP)
                        stopped.append(p.pid)
                except psutil.Error:
                    continue
            time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()
    return stopped
"""
