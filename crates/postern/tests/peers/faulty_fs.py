#!/usr/bin/env python3
"""A pass-through FUSE file system whose syncs can be made to fail, for the tests of a disk
that reports an error.

    faulty_fs.py ROOT MOUNTPOINT CONTROL

Every operation is done on the same path under ROOT. While the file CONTROL exists, every
fsync and fdatasync of a file under MOUNTPOINT fails with EIO (the error a disk's failed
write-back gives), after doing nothing (only those of the file named as CONTROL says, when
it holds a name; with ENOSPC, a full disk's error, when it starts with `ENOSPC:`); while CONTROL.writes exists, so does every write; while CONTROL.reads holds a file name and an offset, so does every read of that page of that file; while CONTROL.hang exists, every fsync waits (with FAULTY_FS_THREADS=1 set, the rest goes on meanwhile). Runs in the foreground until unmounted. Needs root
and fusepy (with libfuse 2).
"""

import errno
import os
import sys
import time

try:
    from fuse import FUSE, FuseOSError, Operations
except ImportError:  # Debian's python3-fusepy names the module fusepy
    from fusepy import FUSE, FuseOSError, Operations


class Faulty(Operations):
    def __init__(self, root, control):
        self.root = root
        self.control = control

    def _path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def __call__(self, op, *args):
        try:
            return super().__call__(op, *args)
        except OSError as e:
            if isinstance(e, FuseOSError):
                raise
            raise FuseOSError(e.errno or errno.EIO) from e

    def access(self, path, mode):
        if not os.access(self._path(path), mode):
            raise FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime",
                "st_ctime", "st_ino")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        # While CONTROL.readdir names a directory (its last component), listing it fails
        # with EIO (a bad directory block).
        try:
            with open(self.control + ".readdir") as f:
                broken = f.read()
        except FileNotFoundError:
            broken = None
        if broken is not None and os.path.basename(path) == broken:
            raise FuseOSError(errno.EIO)
        return [".", ".."] + os.listdir(self._path(path))

    def readlink(self, path):
        return os.readlink(self._path(path))

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
                "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._path(path), uid, gid)

    def mkdir(self, path, mode):
        os.mkdir(self._path(path), mode)

    def rmdir(self, path):
        os.rmdir(self._path(path))

    def unlink(self, path):
        os.unlink(self._path(path))

    def rename(self, old, new):
        os.rename(self._path(old), self._path(new))

    def link(self, target, source):
        os.link(self._path(source), self._path(target))

    def symlink(self, target, source):
        os.symlink(source, self._path(target))

    def utimens(self, path, times=None):
        os.utime(self._path(path), times)

    def open(self, path, flags):
        return os.open(self._path(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)

    def read(self, path, size, offset, fh):
        # While CONTROL.reads holds "NAME OFFSET", a read of a file called NAME that reaches
        # the 4096 octets from OFFSET fails with EIO (a bad sector).
        try:
            with open(self.control + ".reads") as f:
                name, bad = f.read().split()
        except FileNotFoundError:
            name = None
        if name is not None and os.path.basename(path) == name:
            bad = int(bad)
            if offset < bad + 4096 and offset + size > bad:
                raise FuseOSError(errno.EIO)
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        if os.path.exists(self.control + ".writes"):
            raise FuseOSError(errno.EIO)
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        os.truncate(self._path(path), length)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)

    def fsync(self, path, datasync, fh):
        # While CONTROL.hang exists every fsync waits (a disk that stops answering), saying
        # so with CONTROL.hanging. Only useful with threads (FAULTY_FS_THREADS=1): otherwise
        # the whole file system waits with it.
        hang = self.control + ".hang"
        if os.path.exists(hang):
            with open(self.control + ".hanging", "w"):
                pass
            while os.path.exists(hang):
                time.sleep(0.02)
        try:
            with open(self.control) as f:
                only = f.read()
        except FileNotFoundError:
            only = None
        if only is not None:
            code = errno.EIO
            if only.startswith("ENOSPC:"):
                code, only = errno.ENOSPC, only[len("ENOSPC:"):]
            if only == "" or self._is_named(fh, only):
                raise FuseOSError(code)
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    def _is_named(self, fh, name):
        """Whether the open file `fh` is the file called `name` somewhere under the root (by
        inode: an open file's own path may be a hidden one, after a link and an unlink)."""
        ino = os.fstat(fh).st_ino
        for top, _, files in os.walk(self.root):
            if name in files and os.stat(os.path.join(top, name)).st_ino == ino:
                return True
        return False

    def fsyncdir(self, path, datasync, fh):
        fd = os.open(self._path(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def main():
    root, mountpoint, control = sys.argv[1:4]
    threads = os.environ.get("FAULTY_FS_THREADS") == "1"
    FUSE(Faulty(root, control), mountpoint, foreground=True, nothreads=not threads,
         allow_other=True, default_permissions=True)


if __name__ == "__main__":
    main()
