import HTTPTypes
import LedgerCore
import Testing

@testable import LedgerHTTP

@Suite("Routing, credentials and request ids")
struct RoutingTests {
    func match(_ path: String) -> RouteMatch? { RouteMatch.find(path, in: LedgerAPI.routes) }

    @Test(
        "paths map to route patterns and their parameters; anything else is unmatched",
        arguments: [
            ("/health", "/health", [:]), ("/metrics", "/metrics", [:]), ("/openapi.yaml", "/openapi.yaml", [:]),
            ("/v1/credits", "/v1/credits", [:]), ("/v1/debits", "/v1/debits", [:]),
            ("/v1/transfers", "/v1/transfers", [:]), ("/v1/transfers/batch", "/v1/transfers/batch", [:]),
            ("/v1/accounts/alice", "/v1/accounts/{id}", ["id": "alice"]),
            ("/v1/accounts/a%3Ab/entries", "/v1/accounts/{id}/entries", ["id": "a%3Ab"]),
            ("/v1/transfers/42", "/v1/transfers/{id}", ["id": "42"]),
        ] as [(String, String, [String: String])])
    func matches(path: String, pattern: String, parameters: [String: String]) {
        #expect(match(path)?.label == pattern)
        #expect(match(path)?.parameters == parameters)
    }

    @Test(
        "unknown paths",
        arguments: [
            "/", "", "/v1", "/v1/", "/v1/credits/", "/v1/credit", "/health/", "/v1/accounts", "/v1/accounts/a/entries/x",
            "/v2/credits", "/V1/credits", "/v1/accounts/a/b", "/v1/accounts/", "/v1/transfers/", "/v1/accounts//entries",
        ])
    func unmatched(path: String) {
        #expect(match(path) == nil)
    }

    @Test("a path's methods, in table order, are its Allow; route labels are templates, never ids")
    func methodsAndLabels() {
        #expect(match("/v1/accounts/secret-id")?.allow == ["GET", "PUT"])
        #expect(match("/v1/accounts/secret-id")?.route(for: .put)?.label == "/v1/accounts/{id}")
        #expect(match("/v1/accounts/secret-id")?.route(for: .delete) == nil)
        #expect(match("/v1/credits")?.allow == ["POST"])
        #expect(match("/v1/transfers/batch")?.allow == ["POST"], "batch is the batch route, not a transfer id")
        #expect(match("/v1/transfers/123")?.allow == ["GET"])
    }

    @Test("only the batch route has the batch body limit")
    func bodyLimits() {
        let options = HTTPOptions(bodyBytesMax: 10, batchBodyBytesMax: 20)
        for route in LedgerAPI.routes {
            let expected = route.pattern == "/v1/transfers/batch" ? 20 : 10
            #expect(route.bodyLimit.bytes(options) == expected, "\(route.method) \(route.pattern)")
        }
    }

    @Test("the table has one entry per method and pattern, and `ledger routes` prints it in order")
    func table() {
        let lines = LedgerAPI.routeDescriptions
        #expect(Set(lines).count == lines.count)
        #expect(lines.first == "GET /health")
        #expect(lines.contains("GET /v1/accounts/{id}/entries"))
        #expect(lines.count == LedgerAPI.routes.count)
    }

    @Test("bearer credentials")
    func bearer() {
        #expect(Authenticator.bearerToken("Bearer abc") == "abc")
        #expect(Authenticator.bearerToken("bearer   abc ") == "abc")
        #expect(Authenticator.bearerToken("Basic abc") == nil)
        #expect(Authenticator.bearerToken("Bearer") == nil)
        #expect(Authenticator.bearerToken("Bearer ") == nil)
        #expect(Authenticator.bearerToken(nil) == nil)
        #expect(Authenticator.bearerToken("Bearer " + String(repeating: "a", count: 513)) == nil)
        #expect(Authenticator.bearerToken("Bearer abc \t") == "abc")
        #expect(Authenticator.bearerToken("Bearer  \t ") == nil)
    }

    @Test("header values lose spaces and tabs at both ends only")
    func optionalWhitespace() {
        #expect(" \t a b \t".trimmingOWS == "a b")
        #expect("é ".trimmingOWS == "é")
        #expect(" ünï".trimmingOWS == "ünï")
        #expect("".trimmingOWS == "")
        #expect(" \t ".trimmingOWS == "")
        #expect("application/json".trimmingOWS == "application/json")
    }

    @Test("a client's X-Request-Id is kept when sane, replaced otherwise")
    func requestIDs() {
        #expect(RequestTrace.requestID(from: "abc-123") == "abc-123")
        for bad in [nil, "", "has space", String(repeating: "x", count: 129), "tab\there", "é"] {
            let generated = RequestTrace.requestID(from: bad)
            #expect(generated != bad)
            #expect(generated.count == 33)
        }
        // Generated ids: this process's random prefix, then a count; never the same twice.
        let ids = (0..<1000).map { _ in RequestTrace.requestID(from: nil) }
        #expect(Set(ids).count == ids.count)
        #expect(Set(ids.map { $0.prefix(17) }).count == 1)
        #expect(ids.allSatisfy { $0.utf8.allSatisfy { "0123456789abcdef-".utf8.contains($0) } })
    }
}
