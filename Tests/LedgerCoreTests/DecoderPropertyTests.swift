import LedgerCore
import Testing

/// Properties of the request decoder over many generated bodies (seeded, so a failure can be rerun).
@Suite("Request decoder properties")
struct DecoderPropertyTests {
    static let bodyCodes: Set<String> = [
        "invalid-json", "invalid-amount", "invalid-currency", "invalid-account-id", "same-account", "invalid-metadata",
    ]

    @Test("any bytes: a valid request or exactly one of the body codes, never a crash", arguments: 0..<300)
    func anyBytes(seed: Int) {
        var generator = SplitMix(seed: UInt64(seed))
        let length = Int.random(in: 0...200, using: &generator)
        let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
        for kind in TransferRequest.Kind.allCases {
            switch TransferRequest.decode(kind: kind, body: bytes) {
            case .success(let request): #expect(request.amount >= 1)
            case .failure(let problem): #expect(problem.code == "invalid-json" && problem.status == 400)
            }
        }
    }

    @Test("random JSON objects with the right and wrong fields", arguments: 0..<500)
    func randomObjects(seed: Int) throws {
        var generator = SplitMix(seed: UInt64(seed) &+ 10_000)
        var members: [JSONMember] = []
        let candidates = ["account", "from", "to", "amount", "currency", "metadata", "extra"]
        for name in candidates where Int.random(in: 0..<4, using: &generator) > 0 {
            members.append(JSONMember(name, Self.randomField(name, using: &generator)))
        }
        let body = Array(JSONValue.object(members).compactText.utf8)
        for kind in TransferRequest.Kind.allCases {
            switch TransferRequest.decode(kind: kind, body: body) {
            case .success(let request):
                // Whatever was accepted obeys every rule of the contract.
                #expect(request.amount >= 1 && request.amount <= LedgerRules.amountMax)
                #expect(LedgerRules.isValidCurrency(request.currency))
                #expect(request.accounts.allSatisfy(LedgerRules.isValidAccountID))
                #expect(request.from != request.to)
                #expect(request.metadataJSON.utf8.count <= LedgerRules.metadataBytesMax)
                #expect(try JSONParser.parse(Array(request.metadataJSON.utf8)) != .null)
            case .failure(let problem):
                #expect(Self.bodyCodes.contains(problem.code), "unexpected code \(problem.code)")
                #expect(problem.status == 400)
            }
        }
    }

    @Test("valid requests decode to exactly what was sent, whatever the member order", arguments: 0..<200)
    func validRequests(seed: Int) throws {
        var generator = SplitMix(seed: UInt64(seed) &+ 20_000)
        let from = "a\(Int.random(in: 0...999, using: &generator))"
        let to = "b\(Int.random(in: 0...999, using: &generator))"
        let amount = Int64.random(in: 1...LedgerRules.amountMax, using: &generator)
        var members = [
            JSONMember("from", .string(from)), JSONMember("to", .string(to)),
            JSONMember("amount", .number(String(amount))), JSONMember("currency", .string("EUR")),
            JSONMember("metadata", .object([JSONMember("n", .number(String(seed)))])),
        ]
        members.shuffle(using: &generator)
        let request = try TransferRequest.decode(kind: .transfer, body: Array(JSONValue.object(members).compactText.utf8)).get()
        #expect(request.from == from && request.to == to && request.amount == amount && request.currency == "EUR")
        #expect(request.metadataJSON == #"{"n":\#(seed)}"#)
        let sorted = try TransferRequest.decode(
            kind: .transfer, body: Array(JSONValue.object(members.sorted { $0.key < $1.key }).canonicalText.utf8)
        ).get()
        #expect(sorted.fingerprintText == request.fingerprintText)
    }

    static func randomField(_ name: String, using generator: inout SplitMix) -> JSONValue {
        switch (name, Int.random(in: 0..<5, using: &generator)) {
        case ("amount", 0): return .number(String(Int64.random(in: -5...LedgerRules.amountMax, using: &generator)))
        case ("amount", 1): return .number(["1.5", "1e3", "-0", "9007199254740992", "0"].randomElement(using: &generator)!)
        case ("currency", 0), ("currency", 1): return .string(["USD", "EUR", "usd", "US", "USDX"].randomElement(using: &generator)!)
        case ("account", 0), ("from", 0), ("to", 0), ("account", 1), ("from", 1), ("to", 1):
            return .string(["alice", "bob", "@world", ".", "a b", "x"].randomElement(using: &generator)!)
        case ("metadata", 0): return .object([JSONMember("k", .string("v"))])
        default: return JSONValue.random(depth: 2, using: &generator)
        }
    }
}
