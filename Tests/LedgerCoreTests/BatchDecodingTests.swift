import LedgerCore
import Testing

@Suite("Batch decoding and validation")
struct BatchDecodingTests {
    func decode(_ body: String) -> Result<BatchRequest, Problem> {
        BatchRequest.decode(body: Array(body.utf8))
    }

    func problem(_ body: String) -> Problem? {
        if case .failure(let problem) = decode(body) { return problem }
        return nil
    }

    static let item = #"{"from":"a","to":"b","amount":1,"currency":"USD"}"#

    @Test("a valid batch decodes; atomic defaults to true; items keep their order")
    func valid() throws {
        let batch = try decode(#"{"transfers":[\#(Self.item),{"from":"b","to":"c","amount":2,"currency":"EUR","metadata":{"x":1}}]}"#).get()
        #expect(batch.atomic)
        #expect(batch.transfers.map(\.amount) == [1, 2])
        #expect(batch.transfers[1].metadataJSON == #"{"x":1}"#)
        #expect(batch.fingerprintText.hasPrefix("POST /v1/transfers/batch\n"))
        #expect(try decode(#"{"atomic":false,"transfers":[\#(Self.item)]}"#).get().atomic == false)
    }

    @Test("the fingerprint ignores key order and whitespace, not atomic or the items")
    func fingerprint() throws {
        let a = try decode(#"{"atomic":true,"transfers":[\#(Self.item)]}"#).get()
        let b = try decode(#" {"transfers":[{"currency":"USD","amount":1,"to":"b","from":"a"}], "atomic":true} "#).get()
        let c = try decode(#"{"atomic":false,"transfers":[\#(Self.item)]}"#).get()
        #expect(a.fingerprintText == b.fingerprintText)
        #expect(a.fingerprintText != c.fingerprintText)
    }

    @Test(
        "each bad batch gets its code",
        arguments: [
            ("[]", "invalid-json"), (#"{"transfers":[]}"#, "invalid-batch"), (#"{}"#, "invalid-json"),
            (#"{"transfers":{}}"#, "invalid-json"), (#"{"atomic":"yes","transfers":[\#(item)]}"#, "invalid-json"),
            (#"{"transfers":[\#(item)],"extra":1}"#, "invalid-json"), (#"{"transfers":[1]}"#, "invalid-json"),
        ])
    func codes(body: String, code: String) {
        #expect(problem(body)?.code == code)
    }

    @Test("1,000 items are accepted and 1,001 are not")
    func itemsMax() {
        let items = { (count: Int) in Array(repeating: Self.item, count: count).joined(separator: ",") }
        #expect((try? decode(#"{"transfers":[\#(items(1_000))]}"#).get())?.transfers.count == 1_000)
        #expect(problem(#"{"transfers":[\#(items(1_001))]}"#)?.code == "invalid-batch")
    }

    @Test("the first bad item names itself in the detail, with the code of a single transfer")
    func badItem() {
        let body = #"{"transfers":[\#(Self.item),{"from":"a","to":"a","amount":1,"currency":"USD"},{"from":"a","to":"b","amount":0,"currency":"USD"}]}"#
        let problem = problem(body)
        #expect(problem?.code == "same-account")
        #expect(problem?.detail.hasPrefix("transfers[1]: ") == true)
        #expect(self.problem(#"{"transfers":[\#(Self.item),{"from":"a","to":"b","amount":1.5,"currency":"USD"}]}"#)?.code == "invalid-amount")
    }
}
