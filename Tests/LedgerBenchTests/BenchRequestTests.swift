import NIOCore
import NIOHTTP1
import Testing

@testable import LedgerBench

@Suite("Load generator")
struct BenchRequestTests {
    @Test("requests carry Host, the headers and an exact Content-Length")
    func request() {
        let request = BenchConnection.request(
            method: .POST, path: "/v1/transfers", host: "127.0.0.1:8080",
            headers: [("Authorization", "Bearer t"), ("Idempotency-Key", "k")], body: #"{"a":"é"}"#)
        #expect(request.head.uri == "/v1/transfers")
        #expect(request.head.headers["Host"] == ["127.0.0.1:8080"])
        #expect(request.head.headers["Idempotency-Key"] == ["k"])
        #expect(request.head.headers["Content-Length"] == ["10"])
        #expect(request.body.readableBytes == 10)
    }

    @Test("the report line names every number the benchmark prints")
    func reportLine() {
        let report = LoadGenerator.Report(
            workload: .hot, connections: 16, seconds: 2, requests: 1000, transfers: 1000, errors: [503: 2], replays: 0,
            p50Milliseconds: 1.5, p99Milliseconds: 9, p999Milliseconds: 12, maxMilliseconds: 20)
        #expect(report.perSecond == 500)
        #expect(report.errorCount == 2)
        #expect(report.line.contains("workload=hot connections=16"))
        #expect(report.line.contains("rate=500.00/s"))
        #expect(report.line.contains("p99.9=12.00ms"))
        #expect(report.line.contains("errors=2x503"))
        let batch = LoadGenerator.Report(
            workload: .batch, connections: 4, seconds: 2, requests: 10, transfers: 10_000, errors: [:], replays: 0,
            p50Milliseconds: 100, p99Milliseconds: 200, p999Milliseconds: 200, maxMilliseconds: 200)
        #expect(batch.perSecond == 5_000, "a batch counts its transfers")
        #expect(batch.line.contains("requests=10 transfers=10000"))
    }
}
