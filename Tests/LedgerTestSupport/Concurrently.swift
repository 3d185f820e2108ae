/// Runs `body(0..<count)` all at once, as concurrent callers would, and returns every result (in completion order).
/// For storms: many requests with one key, or crossing requests, against a real PostgreSQL.
public func concurrently<T: Sendable>(
    _ count: Int, _ body: @escaping @Sendable (Int) async throws -> T
) async throws -> [T] {
    try await withThrowingTaskGroup(of: T.self) { group in
        for index in 0..<count { group.addTask { try await body(index) } }
        var all: [T] = []
        for try await result in group { all.append(result) }
        return all
    }
}
