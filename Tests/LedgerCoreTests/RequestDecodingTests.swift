@testable import LedgerCore
import Testing

@Suite("Request decoding and validation")
struct RequestDecodingTests {
    func decode(_ kind: TransferRequest.Kind, _ body: String) -> Result<TransferRequest, Problem> {
        TransferRequest.decode(kind: kind, body: Array(body.utf8))
    }

    func code(_ kind: TransferRequest.Kind, _ body: String) -> String? {
        if case .failure(let problem) = decode(kind, body) { return problem.code }
        return nil
    }

    @Test("a valid transfer decodes, with metadata defaulting to {}")
    func validTransfer() throws {
        let request = try decode(.transfer, #"{"from":"alice","to":"bob","amount":250,"currency":"USD"}"#).get()
        #expect(request.from == "alice" && request.to == "bob" && request.amount == 250 && request.currency == "USD")
        #expect(request.metadataJSON == "{}")
        let credit = try decode(.credit, #"{"account":"a.b:c-d_e","amount":1,"currency":"EUR","metadata":{"k":[1]}}"#).get()
        #expect(credit.from == nil && credit.to == "a.b:c-d_e")
        #expect(credit.metadataJSON == #"{"k":[1]}"#)
    }

    @Test("the fingerprint ignores key order and whitespace but not values or the route")
    func fingerprint() throws {
        let a = try decode(.credit, #"{"account":"a","amount":5,"currency":"USD","metadata":{"x":1,"y":2}}"#).get()
        let b = try decode(.credit, #" { "metadata" : {"y":2,"x":1}, "currency":"USD", "amount":5, "account":"a" } "#).get()
        let c = try decode(.credit, #"{"account":"a","amount":6,"currency":"USD","metadata":{"x":1,"y":2}}"#).get()
        let d = try decode(.debit, #"{"account":"a","amount":5,"currency":"USD","metadata":{"x":1,"y":2}}"#).get()
        #expect(a.fingerprintText == b.fingerprintText)
        #expect(a.fingerprintText != c.fingerprintText)
        #expect(a.fingerprintText != d.fingerprintText)
    }

    @Test(
        "each kind of bad body gets its own code",
        arguments: [
            ("not json", "invalid-json"), ("[1]", "invalid-json"), ("", "invalid-json"),
            (#"{"account":"a","amount":1,"currency":"USD","extra":1}"#, "invalid-json"),
            (#"{"account":"a","account":"b","amount":1,"currency":"USD"}"#, "invalid-json"),
            (#"{"amount":1,"currency":"USD"}"#, "invalid-account-id"),
            (#"{"account":5,"amount":1,"currency":"USD"}"#, "invalid-account-id"),
            (#"{"account":"@world","amount":1,"currency":"USD"}"#, "invalid-account-id"),
            (#"{"account":".","amount":1,"currency":"USD"}"#, "invalid-account-id"),
            (#"{"account":"a b","amount":1,"currency":"USD"}"#, "invalid-account-id"),
            (#"{"account":"a","currency":"USD"}"#, "invalid-amount"),
            (#"{"account":"a","amount":0,"currency":"USD"}"#, "invalid-amount"),
            (#"{"account":"a","amount":-1,"currency":"USD"}"#, "invalid-amount"),
            (#"{"account":"a","amount":-0,"currency":"USD"}"#, "invalid-amount"),
            (#"{"account":"a","amount":1.5,"currency":"USD"}"#, "invalid-amount"),
            (#"{"account":"a","amount":1.0,"currency":"USD"}"#, "invalid-amount"),
            (#"{"account":"a","amount":1e3,"currency":"USD"}"#, "invalid-amount"),
            (#"{"account":"a","amount":"100","currency":"USD"}"#, "invalid-amount"),
            (#"{"account":"a","amount":9007199254740992,"currency":"USD"}"#, "invalid-amount"),
            (#"{"account":"a","amount":99999999999999999999999,"currency":"USD"}"#, "invalid-amount"),
            (#"{"account":"a","amount":null,"currency":"USD"}"#, "invalid-amount"),
            (#"{"account":"a","amount":1,"currency":"usd"}"#, "invalid-currency"),
            (#"{"account":"a","amount":1,"currency":"US"}"#, "invalid-currency"),
            (#"{"account":"a","amount":1,"currency":null}"#, "invalid-currency"),
            (#"{"account":"a","amount":1}"#, "invalid-currency"),
            (#"{"account":"a","amount":1,"currency":"USD","metadata":[]}"#, "invalid-metadata"),
            (#"{"account":"a","amount":1,"currency":"USD","metadata":"x"}"#, "invalid-metadata"),
            (#"{"account":"a","amount":1,"currency":"USD","metadata":null}"#, "invalid-metadata"),
            (#"{"account":"a","amount":1,"currency":"USD","metadata":{"k":"\u0000"}}"#, "invalid-metadata"),
        ])
    func badBodies(body: String, expected: String) {
        #expect(code(.credit, body) == expected)
    }

    @Test("2^53-1 is the largest amount")
    func largestAmount() throws {
        let request = try decode(.debit, #"{"account":"a","amount":9007199254740991,"currency":"USD"}"#).get()
        #expect(request.amount == 9_007_199_254_740_991)
    }

    @Test("same-account for a transfer to itself")
    func sameAccount() {
        #expect(code(.transfer, #"{"from":"a","to":"a","amount":1,"currency":"USD"}"#) == "same-account")
    }

    @Test("metadata is limited to 4096 bytes of compact JSON")
    func metadataLimit() {
        // {"k":"<n x>"} is n + 8 bytes compact; whitespace in the request does not count.
        let fits = String(repeating: "x", count: 4096 - 8)
        let over = String(repeating: "x", count: 4096 - 7)
        #expect(code(.credit, #"{"account":"a","amount":1,"currency":"USD","metadata": { "k" :  "\#(fits)" }}"#) == nil)
        #expect(code(.credit, #"{"account":"a","amount":1,"currency":"USD","metadata":{"k":"\#(over)"}}"#) == "invalid-metadata")
    }

    @Test("account bodies: currency required, allow_negative boolean, nothing else")
    func accountBodies() throws {
        #expect(try AccountRequest.decode(body: Array(#"{"currency":"USD"}"#.utf8)).get() == AccountRequest(currency: "USD", allowNegative: false))
        #expect(try AccountRequest.decode(body: Array(#"{"currency":"EUR","allow_negative":true}"#.utf8)).get().allowNegative)
        func code(_ body: String) -> String? {
            if case .failure(let problem) = AccountRequest.decode(body: Array(body.utf8)) { return problem.code }
            return nil
        }
        #expect(code(#"{"currency":"USD","allow_negative":"yes"}"#) == "invalid-json")
        #expect(code(#"{"currency":"USD","x":1}"#) == "invalid-json")
        #expect(code(#"{"allow_negative":true}"#) == "invalid-currency")
    }

    @Test("problems render as RFC 9457 JSON")
    func problemJSON() throws {
        let problem = Problem.invalidAmount("say \"why\"")
        let value = try JSONParser.parse(Array(problem.jsonText.utf8))
        #expect(value["type"] == .string("urn:ledger:problem:invalid-amount"))
        #expect(value["status"] == .number("400"))
        #expect(value["code"] == .string("invalid-amount"))
        #expect(value["detail"] == .string("say \"why\""))
        #expect(value["title"] != nil)
    }
}

@Suite("Idempotency-Key header")
struct IdempotencyKeyTests {
    func parse(_ values: [String]) -> Result<IdempotencyKey, Problem> { IdempotencyKey.parse(headerValues: values) }

    @Test("bare tokens and sf-strings spell the same key")
    func forms() throws {
        #expect(try parse(["abc-123"]).get().value == "abc-123")
        #expect(try parse(["\"abc-123\""]).get().value == "abc-123")
        #expect(try parse([#""a\"b\\c d""#]).get().value == #"a"b\c d"#)
        #expect(try parse([#"a\b"#]).get().value == #"a\b"#)
        #expect(try parse(["ABC"]).get() != parse(["abc"]).get())
    }

    @Test("255 characters pass, 256 do not, counted after unquoting")
    func length() throws {
        let max = String(repeating: "k", count: 255)
        #expect(try parse([max]).get().value == max)
        #expect(try parse(["\"\(max)\""]).get().value == max)
        #expect(code([max + "k"]) == "idempotency-key-invalid")
        #expect(code(["\"\(max)k\""]) == "idempotency-key-invalid")
    }

    func code(_ values: [String]) -> String? {
        if case .failure(let problem) = parse(values) { return problem.code }
        return nil
    }

    @Test(
        "missing and invalid keys",
        arguments: [
            ([], "idempotency-key-missing"), ([""], "idempotency-key-invalid"), (["\"\""], "idempotency-key-invalid"),
            (["a b"], "idempotency-key-invalid"), (["a\"b"], "idempotency-key-invalid"), (["ké"], "idempotency-key-invalid"),
            (["a\u{01}"], "idempotency-key-invalid"), (["\"abc"], "idempotency-key-invalid"),
            (["\"a\"b\""], "idempotency-key-invalid"), (["\"a\\x\""], "idempotency-key-invalid"),
            (["\"abc\"x"], "idempotency-key-invalid"), (["a", "b"], "idempotency-key-invalid"),
        ] as [([String], String)])
    func invalid(values: [String], expected: String) {
        #expect(code(values) == expected)
    }
}

@Suite("Entries paging")
struct EntriesPageTests {
    let key = CursorKey(bytes: Array(repeating: 7, count: 32))

    func parse(client: String = "acme", account: String = "a", limit: String? = nil, cursor: String? = nil)
        -> Result<EntriesPage, Problem>
    {
        EntriesPage.parse(client: client, account: account, limit: limit, cursor: cursor, key: key)
    }

    func refused(_ result: Result<EntriesPage, Problem>) -> String? {
        guard case .failure(let problem) = result else { return nil }
        return problem.code
    }

    @Test("limit is 1...500, default 50")
    func limits() throws {
        #expect(try parse().get().limit == 50)
        #expect(try parse(limit: "500").get().limit == 500)
        for bad in ["0", "501", "-1", "abc", "", "1.5", "99999999999999999999"] {
            #expect(refused(parse(limit: bad)) == "invalid-limit", "limit \(bad)")
        }
    }

    @Test("a cursor round-trips for its client and account only")
    func cursors() throws {
        let cursor = key.encode(client: "acme", account: "alice", beforeVersion: 42)
        #expect(try parse(account: "alice", cursor: cursor).get().beforeVersion == 42)
        #expect(refused(parse(account: "bob", cursor: cursor)) == "invalid-cursor", "another account")
        #expect(refused(parse(client: "other", account: "alice", cursor: cursor)) == "invalid-cursor", "another client")
        let otherKey = CursorKey(bytes: Array(repeating: 8, count: 32))
        let foreign = otherKey.encode(client: "acme", account: "alice", beforeVersion: 42)
        #expect(refused(parse(account: "alice", cursor: foreign)) == "invalid-cursor", "another database's key")
    }

    @Test("a cursor the key did not issue is refused, however well-formed")
    func madeUpCursors() throws {
        let issued = key.encode(client: "acme", account: "alice", beforeVersion: 42)
        let text = String(decoding: Base64URL.decode(issued)!, as: UTF8.self)
        let mac = text.split(separator: ":").last!
        // The same MAC on another position, the scheme before signing (an unkeyed check), edits and junk.
        let made = [
            Base64URL.encode(Array("e2:41:\(mac)".utf8)),
            Base64URL.encode(Array("e1:alice:42:\(String(Self.fnv1a("e1:alice:42"), radix: 16))".utf8)),
            Base64URL.encode(Array("e2:42:".utf8)), Base64URL.encode(Array("e2:0:\(mac)".utf8)),
            issued + "x", String(issued.dropLast()), "garbage", "", "e2:42:\(mac)",
            key.encode(client: "acme", account: "alice", beforeVersion: 0),
        ]
        for cursor in made {
            #expect(refused(parse(account: "alice", cursor: cursor)) == "invalid-cursor", "cursor \(cursor)")
        }
    }

    static func fnv1a(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in text.utf8 {
            hash ^= UInt64(byte)
            hash &*= 0x0000_0100_0000_01B3
        }
        return hash
    }
}

@Suite("Metadata numbers as PostgreSQL stores them")
struct MetadataNumberTests {
    @Test(
        "plain decimals with numeric's scale",
        arguments: [
            ("0", "0"), ("-0", "0"), ("-0.0", "0.0"), ("12", "12"), ("-12", "-12"), ("1.50", "1.50"),
            ("1e3", "1000"), ("1E+3", "1000"), ("1.5e1", "15"), ("1.50e1", "15.0"), ("1.5e-3", "0.0015"),
            ("15e-1", "1.5"), ("0.001e3", "1"), ("123.456e-5", "0.00123456"), ("-2.5e2", "-250"), ("0e5", "0"),
            ("100e-2", "1.00"),
        ])
    func plain(lexeme: String, expected: String) throws {
        let value = try #require(JSONValue.number(lexeme).expandingNumbers())
        #expect(value == .number(expected))
    }

    @Test("the 4096-byte metadata limit counts expanded numbers; absurd exponents are refused")
    func limits() {
        func code(_ metadata: String) -> String? {
            let body = #"{"account":"a","amount":1,"currency":"USD","metadata":\#(metadata)}"#
            if case .failure(let problem) = TransferRequest.decode(kind: .credit, body: Array(body.utf8)) {
                return problem.code
            }
            return nil
        }
        #expect(code(#"{"x":1e200000}"#) == "invalid-metadata")
        #expect(code(#"{"x":1e-200000}"#) == "invalid-metadata")
        #expect(code(#"{"x":1e99999999999999999999}"#) == "invalid-metadata")
        #expect(code(#"{"x":1e4090}"#) == "invalid-metadata")  // 4091 digits: over the limit once stored
        #expect(code(#"{"x":1e100}"#) == nil)
        let request = try? TransferRequest.decode(
            kind: .credit, body: Array(#"{"account":"a","amount":1,"currency":"USD","metadata":{"x":1.5e2}}"#.utf8)
        ).get()
        #expect(request?.metadataJSON == #"{"x":150}"#)
    }
}
