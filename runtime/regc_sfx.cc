// regc single-file bundle launcher (see regc.runtime._bundle_sfx): a statically linked executable
// with an edge bundle appended to it.
//
//   FILE IN_DIR OUT_DIR
//
// Reads its own file (/proc/self/exe), extracts the appended bundle into a fresh private folder
// (mode 0700) under $REGC_TMPDIR, else $TMPDIR, else /tmp, runs the bundle's regc_run on it (which
// checks every file against the manifest's sha256 before loading anything), removes the folder and
// exits with regc_run's status. $REGC_EXEC_PREFIX (space-separated), when set, prefixes the regc_run
// command line: on a host of another architecture, "qemu-aarch64-static -L /usr/aarch64-linux-gnu".
//
// Layout after the executable (all integers little-endian):
//   per file:  u16 name length, name (relative path: [A-Za-z0-9._-] components, '/'-separated, no
//              '..'), u32 mode, u64 size, the bytes
//   trailer:   u64 offset of the first file, u32 file count, u32 zero, 8 bytes "REGCSFX1"
// Exit status: regc_run's; 2 when the file is not a well-formed single-file bundle or cannot be
// extracted (message on stderr); 1 when regc_run cannot be started.
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

namespace {

const char kMagic[8] = {'R', 'E', 'G', 'C', 'S', 'F', 'X', '1'};
const size_t kTrailer = 24;

struct Failure {
  std::string what;
};

uint64_t Le(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void ReadAt(int fd, void* buf, size_t n, uint64_t at) {
  size_t done = 0;
  while (done < n) {
    ssize_t got = pread(fd, static_cast<char*>(buf) + done, n - done, static_cast<off_t>(at + done));
    if (got <= 0) throw Failure{"truncated single-file bundle (read past its end)"};
    done += static_cast<size_t>(got);
  }
}

bool SafeName(const std::string& name) {
  if (name.empty() || name.size() > 255 || name[0] == '/') return false;
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find('/', start);
    if (end == std::string::npos) end = name.size();
    std::string part = name.substr(start, end - start);
    if (part.empty() || part == "." || part == "..") return false;
    for (char c : part)
      if (!(isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) return false;
    start = end + 1;
  }
  return true;
}

// Extracted files and folders, removed in reverse order on exit.
struct Extracted {
  std::string root;
  std::vector<std::string> paths;  // files and sub-folders, in creation order
  ~Extracted() {
    for (auto it = paths.rbegin(); it != paths.rend(); ++it)
      if (unlink(it->c_str()) != 0) rmdir(it->c_str());
    if (!root.empty()) rmdir(root.c_str());
  }
};

void MakeParents(Extracted& ex, const std::string& name) {
  for (size_t slash = name.find('/'); slash != std::string::npos; slash = name.find('/', slash + 1)) {
    std::string dir = ex.root + "/" + name.substr(0, slash);
    if (mkdir(dir.c_str(), 0700) == 0) {
      ex.paths.push_back(dir);
    } else if (errno != EEXIST) {
      throw Failure{"cannot create " + dir + ": " + strerror(errno)};
    }
  }
}

void CopyOut(int fd, uint64_t at, uint64_t size, const std::string& path, uint32_t mode) {
  int out = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL, (mode & 0111) ? 0700 : 0600);
  if (out < 0) throw Failure{"cannot create " + path + ": " + strerror(errno)};
  std::vector<char> buf(1 << 20);
  while (size > 0) {
    size_t n = size < buf.size() ? static_cast<size_t>(size) : buf.size();
    ReadAt(fd, buf.data(), n, at);
    for (size_t w = 0; w < n;) {
      ssize_t put = write(out, buf.data() + w, n - w);
      if (put <= 0) {
        close(out);
        throw Failure{"cannot write " + path + ": " + strerror(errno)};
      }
      w += static_cast<size_t>(put);
    }
    at += n;
    size -= n;
  }
  if (close(out) != 0) throw Failure{"cannot write " + path + ": " + strerror(errno)};
}

void Extract(int fd, uint64_t file_size, Extracted& ex) {
  if (file_size < kTrailer) throw Failure{"not a regc single-file bundle (no payload)"};
  unsigned char t[kTrailer];
  ReadAt(fd, t, kTrailer, file_size - kTrailer);
  if (memcmp(t + 16, kMagic, 8) != 0) throw Failure{"not a regc single-file bundle (no payload)"};
  uint64_t at = Le(t, 8), end = file_size - kTrailer;
  uint64_t count = Le(t + 8, 4);
  if (at > end || count > 4096) throw Failure{"corrupt single-file bundle (bad trailer)"};
  for (uint64_t i = 0; i < count; ++i) {
    unsigned char head[2];
    if (end - at < 2) throw Failure{"corrupt single-file bundle (entry past the payload)"};
    ReadAt(fd, head, 2, at);
    uint64_t name_len = Le(head, 2);
    if (end - at - 2 < name_len + 12) throw Failure{"corrupt single-file bundle (entry past the payload)"};
    std::string name(name_len, '\0');
    ReadAt(fd, &name[0], name_len, at + 2);
    unsigned char meta[12];
    ReadAt(fd, meta, 12, at + 2 + name_len);
    uint32_t mode = static_cast<uint32_t>(Le(meta, 4));
    uint64_t size = Le(meta + 4, 8);
    at += 2 + name_len + 12;
    if (!SafeName(name)) throw Failure{"corrupt single-file bundle (unsafe file name '" + name + "')"};
    if (size > end - at) throw Failure{"corrupt single-file bundle (" + name + " runs past the payload)"};
    MakeParents(ex, name);
    std::string path = ex.root + "/" + name;
    CopyOut(fd, at, size, path, mode);
    ex.paths.push_back(path);
    at += size;
  }
  if (at != end) throw Failure{"corrupt single-file bundle (bytes after the last entry)"};
}

int RunRunner(const Extracted& ex, const char* in_dir, const char* out_dir) {
  std::vector<std::string> words;
  if (const char* prefix = getenv("REGC_EXEC_PREFIX")) {
    std::string p(prefix);
    for (size_t i = 0; i < p.size();) {
      size_t j = p.find(' ', i);
      if (j == std::string::npos) j = p.size();
      if (j > i) words.push_back(p.substr(i, j - i));
      i = j + 1;
    }
  }
  words.push_back(ex.root + "/regc_run");
  words.push_back(ex.root);
  words.push_back(in_dir);
  words.push_back(out_dir);
  std::vector<char*> argv;
  for (std::string& w : words) argv.push_back(&w[0]);
  argv.push_back(nullptr);
  pid_t pid = fork();
  if (pid < 0) throw Failure{std::string("fork failed: ") + strerror(errno)};
  if (pid == 0) {
    execvp(argv[0], argv.data());
    fprintf(stderr, "regc bundle: cannot start %s: %s\n", argv[0], strerror(errno));
    _exit(1);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) throw Failure{std::string("waitpid failed: ") + strerror(errno)};
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s IN_DIR OUT_DIR  (inputs IN_DIR/<i>.npy, outputs OUT_DIR/<i>.npy)\n", argv[0]);
    return 2;
  }
  try {
    int fd = open("/proc/self/exe", O_RDONLY);
    if (fd < 0) throw Failure{std::string("cannot read /proc/self/exe: ") + strerror(errno)};
    struct stat st;
    if (fstat(fd, &st) != 0) throw Failure{std::string("cannot stat /proc/self/exe: ") + strerror(errno)};
    const char* base = getenv("REGC_TMPDIR");
    if (base == nullptr || !*base) base = getenv("TMPDIR");
    if (base == nullptr || !*base) base = "/tmp";
    std::string root = std::string(base) + "/regc-XXXXXX";
    if (mkdtemp(&root[0]) == nullptr) throw Failure{"cannot create a folder in " + std::string(base) + ": " +
                                                    strerror(errno) + " (set REGC_TMPDIR)"};
    Extracted ex;
    ex.root = root;
    Extract(fd, static_cast<uint64_t>(st.st_size), ex);
    close(fd);
    return RunRunner(ex, argv[1], argv[2]);
  } catch (const Failure& f) {
    fprintf(stderr, "regc bundle: error: %s\n", f.what.c_str());
    return 2;
  }
}
