import ServiceLifecycle

#if os(Linux)
/// glibc's `int malloc_trim(size_t pad)` (malloc.h, which the Glibc module leaves out).
@_silgen_name("malloc_trim") private func glibcMallocTrim(_ pad: Int) -> Int32
#endif

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
                    Self.trim()
                }
            }
        } catch is CancellationError {
            // Graceful shutdown: nothing to finish.
        }
    }

    static func trim() {
        #if os(Linux)
        _ = glibcMallocTrim(0)
        #endif
    }
}
