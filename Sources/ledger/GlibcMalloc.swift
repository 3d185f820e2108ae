import ServiceLifecycle

#if os(Linux)
/// glibc's `int mallopt(int param, int value)` (malloc.h, which the Glibc module leaves out).
@_silgen_name("mallopt") private func glibcMallopt(_ parameter: Int32, _ value: Int32) -> Int32
/// glibc's `int malloc_trim(size_t pad)` (malloc.h).
@_silgen_name("malloc_trim") private func glibcMallocTrim(_ pad: Int) -> Int32
/// `M_ARENA_MAX` of malloc.h.
private let glibcMallocArenaMax: Int32 = -8
#endif

/// What the service asks of glibc's allocator, in one place: few arenas, and freed memory given back.
enum GlibcMalloc {
    /// glibc gives each thread that allocates under contention an arena of its own, up to 8 per core, and each
    /// keeps what its threads freed: after bursts of 1 MiB batch bodies that is megabytes of RSS per arena. Two
    /// arenas keep the footprint bounded at no measurable cost (BENCHMARKS.md). `MALLOC_ARENA_MAX` still wins.
    static func boundArenas() {
        #if os(Linux)
        if Environment.string("MALLOC_ARENA_MAX") == nil { _ = glibcMallopt(glibcMallocArenaMax, 2) }
        #endif
    }

    /// Returns the arenas' free pages to the system (`malloc_trim(0)`).
    static func trim() {
        #if os(Linux)
        _ = glibcMallocTrim(0)
        #endif
    }
}

/// Gives the heap memory the allocator keeps after a burst back to the system, every `interval`.
///
/// glibc returns freed memory to its arenas, not to the system: after 64 connections of holds or batch bodies of
/// 1 MiB, about 20 MiB stayed resident unused (measured: 38.6 MiB of anonymous memory, 17.5 MiB after one trim).
/// A trim walks the two arenas' free lists and calls `madvise` on each free run of pages (no I/O, so it runs on the
/// task pool); the pages it returns come back as page faults only if a later burst needs them.
struct MemoryTrimService: Service {
    /// Time between trims. Default 10 s.
    let interval: Duration

    init(interval: Duration) {
        precondition(interval > .zero, "the trim interval must be positive")
        self.interval = interval
    }

    func run() async throws {
        do {
            try await cancelWhenGracefulShutdown {
                while !Task.isCancelled {
                    try await Task.sleep(for: interval)
                    GlibcMalloc.trim()
                }
            }
        } catch is CancellationError {
            // Graceful shutdown: nothing to finish.
        }
    }
}
