import LedgerCore
import Testing

@testable import LedgerHTTP

@Suite("Routing, credentials and request ids")
struct RoutingTests {
    typealias Route = LedgerAPI.Route

    @Test(
        "paths map to routes; anything else is unmatched",
        arguments: [
            ("/health", Route.health), ("/metrics", .metrics), ("/openapi.yaml", .openAPI),
            ("/v1/credits", .post(.credit)), ("/v1/debits", .post(.debit)), ("/v1/transfers", .post(.transfer)),
            ("/v1/accounts/alice", .account("alice")), ("/v1/accounts/a%3Ab/entries", .entries("a%3Ab")),
            ("/v1/transfers/42", .transfer("42")),
        ] as [(String, Route)])
    func matches(path: String, route: Route) {
        #expect(Route.match(path) == route)
    }

    @Test(
        "unknown paths",
        arguments: [
            "/", "", "/v1", "/v1/", "/v1/credits/", "/v1/credit", "/health/", "/v1/accounts", "/v1/accounts/a/entries/x",
            "/v2/credits", "/V1/credits", "/v1/accounts/a/b", "/v1/accounts/", "/v1/transfers/", "/v1/accounts//entries",
        ])
    func unmatched(path: String) {
        #expect(Route.match(path) == nil)
    }

    @Test("route labels are templates, never ids")
    func labels() {
        #expect(Route.account("secret-id").label == "/v1/accounts/{id}")
        #expect(Route.entries("secret-id").label == "/v1/accounts/{id}/entries")
        #expect(Route.transfer("123").label == "/v1/transfers/{id}")
        #expect(Route.account("x").methods.map(\.rawValue) == ["GET", "PUT"])
        #expect(Route.post(.credit).methods.map(\.rawValue) == ["POST"])
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
            #expect(generated.count == 36)
        }
    }
}
